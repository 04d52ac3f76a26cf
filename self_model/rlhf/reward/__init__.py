"""The reward-model stage: a sequence classifier scoring prompt + reply, trained on preference pairs."""
