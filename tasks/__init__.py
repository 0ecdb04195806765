"""zhchat.tasks."""
