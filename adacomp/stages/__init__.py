"""Post-training compression stages: shrink a trained model for deployment.

In the style of torchao's ``quantize_``::

    from adacomp.stages import LowRankConfig, compress_, load

    report = compress_(model, LowRankConfig(ratio=0.8, method="bsr"), evaluate=calib_accuracy)
    print(report)                                    # per-layer and total params/bytes, ratio, metric
    torch.save(model.state_dict(), "small.pt")
    model = load(build_model(), "small.pt")          # rebuilds the compressed layers, loads weights

Stages register with :func:`register_stage`; :func:`compress_` picks one by its config's type.
Every stage that trains runs :func:`finetune`, the one training loop; :func:`compress_` draws
progress bars of slow phases when stderr is a terminal (``progress=True``: always, ``False``: never).
Optional dependencies (scikit-learn, ``constriction``) are imported only by the stage that needs
them, with an ``ImportError`` naming what to install when they are missing.
Registered here: ``lowrank`` (:class:`LowRankConfig`, BSR low-rank factorization, Eo et al. 2023),
``embedding`` (:class:`EmbeddingConfig`, task-aware compression of word-embedding tables,
Sathyendra et al. 2020, ``docs/embedding.md``),
``dirnet`` (:class:`DictionaryConfig`, dictionary-learning compression of RNNs, Zhang et al. 2018,
``docs/dirnet.md``).
Not a ``compress_`` stage: :func:`encode` with :class:`SGAConfig` / :class:`BitsBackConfig` refines
an image codec's latents per image at encode time (Yang et al. 2020, ``docs/sga.md``).
See ``docs/stages.md``.
"""

from .dictionary import DictionaryConfig, DictionaryStage, DictLinear, DictRNN, SparseCodes, set_inference
from .embedding import EmbeddingConfig, EmbeddingStage, Int8Embedding, LowRankEmbedding, PQEmbedding
from .frame import (
    EXTRA_STATE_KEY,
    LayerRecord,
    LayerSizes,
    Report,
    Stage,
    StageInputs,
    UnsupportedLayerError,
    compress_,
    config_from_dict,
    finetune,
    get_stage,
    layer_sizes,
    load,
    module_bytes,
    module_params,
    register_stage,
    save,
    stages,
)
from .lowrank import (
    LowRankConfig,
    LowRankConv2d,
    LowRankLinear,
    LowRankStage,
    factorize,
    modified_stable_rank,
    regularize,
)
from .sga import BitsBackConfig, SGAConfig, TemperatureSchedule, encode, refine_latents, sga_round

__all__ = [
    "DictLinear",
    "DictRNN",
    "DictionaryConfig",
    "DictionaryStage",
    "SparseCodes",
    "set_inference",
    "EmbeddingConfig",
    "EmbeddingStage",
    "Int8Embedding",
    "LowRankEmbedding",
    "PQEmbedding",
    "EXTRA_STATE_KEY",
    "LayerRecord",
    "LowRankConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankStage",
    "Report",
    "Stage",
    "UnsupportedLayerError",
    "compress_",
    "config_from_dict",
    "factorize",
    "get_stage",
    "load",
    "modified_stable_rank",
    "module_bytes",
    "module_params",
    "register_stage",
    "regularize",
    "save",
    "stages",
    # for writing a stage
    "LayerSizes",
    "StageInputs",
    "finetune",
    "layer_sizes",
    "BitsBackConfig",
    "SGAConfig",
    "TemperatureSchedule",
    "encode",
    "refine_latents",
    "sga_round",
]
