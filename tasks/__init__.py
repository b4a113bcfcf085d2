"""Datasets as chat conversations, one file per dataset; tasks/common.py holds what they share."""
