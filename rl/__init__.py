"""zhchat.rl."""
