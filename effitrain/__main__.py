"""`python -m effitrain ...` is the `effitrain` command (what `torchrun -m effitrain run ...` starts on every rank)."""

from effitrain.cli import main

if __name__ == "__main__":
    main()
