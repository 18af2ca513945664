"""Self-supervised pre-training, labels never read: SimCLR (`contrastive`), masked-language
models (`masked`), where a classifier's representation is (`encoder`), and the k-NN probe that
scores it (`probe`)."""
