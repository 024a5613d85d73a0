"""Captioning core: what runs inside each msrun rank."""
