"""Loads the native extension. (Placeholder until the kernels land: reports it is not built.)"""


def load():
    return None, "the native extension is not part of this build yet"


def has_cuda() -> bool:
    return False
