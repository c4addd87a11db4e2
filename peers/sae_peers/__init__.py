"""The peer benchmark's runners for SAELens and sparsify, which run in the peers' virtual
environment (``.venv-peers``, launch/peers_env.sh) and never import sae-forge, and what every
runner shares (:mod:`.runtime`, which sae-forge's own runner imports too).

Started by ``python -m sae.bench.peers`` and ``python -m sae.bench.transcoders`` as
``<peers python> -P -m sae_peers.<saelens|sparsify> JOB.json`` with this folder's parent,
``peers/``, as the only addition to ``sys.path`` (:func:`sae_peers.venv.peer_command`): ``-P``
keeps the working directory, the repo root, off it (its ``kernels/`` folder would pass for Hugging
Face's ``kernels`` package).
"""
