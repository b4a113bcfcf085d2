"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk), for midtraining and SFT.

Contract:
- `SmolTalk(split="train" | "test")`: about 460K / 24K conversations in the hub's order, each `{"messages":
  [...]}` as published (an optional system message, then user/assistant turns; the tokenizer folds a system
  message into the first user turn).
- Hub only, through `datasets`: no local copy exists here, so offline (or with no cached copy) construction
  fails with an error naming the dataset, rather than silently training without it.

Not here: evaluation (training-only), or filtering of the conversations.
"""

from tasks.common import Task, check_choice, load_hub_rows

HUB_PATH = "HuggingFaceTB/smol-smoltalk"
OFFLINE_HINT = (
    "SmolTalk has no local copy: run where the hub is reachable once (datasets then caches it under HF_HOME), "
    "or leave SmolTalk out of the mixture."
)


class SmolTalk(Task):
    def __init__(self, split: str = "train", **slice_args):
        super().__init__(**slice_args)
        check_choice("SmolTalk split", split, ("train", "test"))
        self.split = split
        self.rows = load_hub_rows(HUB_PATH, None, split, offline_hint=OFFLINE_HINT)

    def get_example(self, index: int) -> dict:
        messages = [{"role": m["role"], "content": m["content"]} for m in self.rows[index]["messages"]]
        return {"messages": messages}
