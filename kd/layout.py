"""Names of the files and folders inside stage artifacts, shared by the stages that write and read them."""

STUDENT_DIR = "student"  # a trained model (teacher or student) with its tokenizer, loadable by from_pretrained
BEST_DIR = "best"  # in a training checkpoint: the student of the best final-phase epoch on dev so far
HISTORY_FILE = "history.json"  # per-epoch training records next to a checkpoint's student
PRETRAINED_DIR = "pretrained"  # in a teacher artifact: the checkpoint it was fine-tuned from, with a fresh head
MLM_DIR = "model"  # the masked-LM teacher inside its artifact
TOKENIZER_DIR = "tokenizer"  # a student's own vocabulary inside a vocabulary artifact
ENCODER_DIR = "encoder"  # a general-distillation artifact (and its checkpoints): the student encoder and tokenizer
