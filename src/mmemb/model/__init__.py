"""The inference core: a Qwen-VL backbone with the token protocol, decoding on a KV cache, and the
``Embedder`` that encodes items in direct / reason / auto mode (plus the plug-in gate's inference half).

Nothing here imports the training engine, the method's stages, evaluation, serving or the pipeline.
"""

import logging
import warnings


class _CacheRenameNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`past_key_values`/`cache_params` are deprecated" not in record.getMessage()


def silence_cache_rename_warnings() -> None:
    """Recent transformers releases renamed the models' ``past_key_values`` argument to ``cache`` and
    warn on every call with the old name, which every transformers 5 release understands and mmemb
    passes. Exactly those two messages are silenced; every other warning still shows."""
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    log = logging.getLogger("transformers.utils.generic")
    if not any(isinstance(f, _CacheRenameNotice) for f in log.filters):
        log.addFilter(_CacheRenameNotice())


silence_cache_rename_warnings()
