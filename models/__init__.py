"""Plain Pyro model files, installed as ``ppl_em.models``. None of them imports ppl_em."""
