"""Host-side programs: meter simulator, pty link, demo."""
