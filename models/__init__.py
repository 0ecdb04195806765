"""zhchat.models."""
