"""The mini-batch family (every spec without an exact chunk form): inside a chunk of ``C`` tokens
every inner gradient is taken at the chunk-start memory (the Miras paper, Eq. 28-32).

    reference.py   the semantics as plain loops over chunks (the oracle)
    chunk.py       the XLA chunk form (autodiff backward: momentum, channel-wise decay)
    vjp.py         the same chunk math for GD specs with a hand-written backward
    decay.py       decay products inside a chunk, shared by both
"""
