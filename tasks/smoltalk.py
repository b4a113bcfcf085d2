"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk), for midtraining and SFT.

Contract:
- `SmolTalk(split="train" | "test")`: about 460K / 24K conversations, `{"messages": [...]}` as published.
- Hub only: offline without a cached copy, construction fails naming the dataset instead of training without it.

Not here: evaluation (training-only), or filtering of the conversations.
"""

from tasks.common import Task, check_choice, load_hub_rows

HUB_PATH = "HuggingFaceTB/smol-smoltalk"
OFFLINE_HINT = "SmolTalk has no local copy: run once where the hub is reachable (it is cached), or leave it out."


class SmolTalk(Task):
    def __init__(self, split: str = "train", **slice_args):
        super().__init__(**slice_args)
        check_choice("SmolTalk split", split, ("train", "test"))
        self.split = split
        self.rows = load_hub_rows(HUB_PATH, None, split, offline_hint=OFFLINE_HINT)

    def get_example(self, index: int) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        return {"messages": messages}
