"""Attention backends. Each computes the function of ``reference``; see
``levyattn.functional`` for how one is chosen."""
