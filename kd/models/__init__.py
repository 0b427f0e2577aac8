"""Student architectures that are not a plain BERT classifier: the BiLSTM, FastBERT's exit branches, the
MobileBERT-style bottleneck, the BERT with factorised (ALBERT-style, E-wide) embeddings, and DualTrain's vocabulary
and shared projections. Importing a module registers its architecture with transformers' Auto classes, so a saved
student loads with ``AutoModelForSequenceClassification``; ``kd.methods`` imports them all (the factorised BERT
through ``kd.students``, which builds it for a ``StudentShape`` with ``embedding_size``)."""
