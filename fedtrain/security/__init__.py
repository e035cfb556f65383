"""Keys, authenticated encryption envelopes and encrypted files. No training code here."""
