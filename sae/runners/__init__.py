"""The runners: every command-line entry point and the orchestration of a run, above the library
stages they drive (README, "Layout"). ``sae-harvest``, ``sae-train``, ``sae-eval`` and
``sae-export`` (:mod:`.cli`), ``sae-steer`` and ``sae-attribute`` (:mod:`.use`); the Hydra
composition (:mod:`.config`); the harvest pipeline (:mod:`.harvest`), a training run (:mod:`.train`),
a full evaluation (:mod:`.evaluate`), an export (:mod:`.export`). Nothing below imports this package."""
