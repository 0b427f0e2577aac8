"""Student architectures that are not a plain BERT classifier: the BiLSTM, FastBERT's exit branches, the
MobileBERT-style bottleneck, and DualTrain's vocabulary and shared projections. Importing a module registers its
architecture with transformers' Auto classes, so a saved student loads with ``AutoModelForSequenceClassification``."""
