"""Training: one model-agnostic loop (:mod:`.loop`), per-model tasks (:mod:`.task`), and the Ray
Train driver that runs it on N workers and records it in MLflow (:mod:`.runner`)."""
