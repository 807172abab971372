"""The paper's 780M language model (Table 5; ``_paper.py`` has the shared settings)."""

from experiments.configs._paper import paper_config


def get_config():
    return paper_config("lm780m")
