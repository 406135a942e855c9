"""A tiny LLaVA-OneVision trained here on procedural video-QA (see data.py, model.py,
train.py): real answers offline, and accuracy under compression measurable on a CPU."""
