"""Evaluation: the zero-shot/retrieval evaluation run during training (`evaluation`), the standalone
evaluator with the DataComp fork's arguments (`evaluate`), the normalizer estimation-error diagnostic
(`estimation_error`) and its standalone command (`diagnostics`)."""
