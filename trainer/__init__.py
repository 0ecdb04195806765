"""zhchat.trainer."""
