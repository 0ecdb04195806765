"""zhchat.gin_configs."""
