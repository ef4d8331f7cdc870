"""Layer 3, training: the one recipe (``train.py``, read top to bottom), the jobs it hands to a
method (``jobs.py``), supervised and preference methods, the transformers Trainer as configured
here, callbacks, resume, best-step selection and several processes."""
