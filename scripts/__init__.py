"""zhchat.scripts."""
