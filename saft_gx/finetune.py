"""The old path of :mod:`saft_gx.train.finetune`, kept so ``python -m saft_gx.finetune`` (under torchrun or
``accelerate launch -m saft_gx.finetune``) and ``from saft_gx.finetune import ...`` keep working after the
modules moved into layer folders. Imported, this name *is* the real module (one object, so patching either
path patches both); run as a program, it is the ``saft-gx finetune`` command."""

import sys

from .train import finetune as _finetune

if __name__ == "__main__":
    # a program, not a library import: reaching up to the command makes no import circle
    from saft_gx.cli.finetune import main

    main()
else:
    sys.modules[__name__] = _finetune
