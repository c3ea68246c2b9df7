"""SimCLR finetuning of the encoder on the archive itself (PRIMER's recipe), from the preprocessed cache."""
