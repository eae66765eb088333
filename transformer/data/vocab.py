"""Special tokens, defined in one place. Every tokenizer and model uses these ids."""

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # index == id
