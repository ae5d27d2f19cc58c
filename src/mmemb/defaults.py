"""One default per setting, shared by every entry point: ``Embedder.encode``, ``mmemb encode``,
``mmemb eval``, ``mmemb index`` / ``search`` and ``mmemb serve`` (the policy table is in the README).

Light on purpose (no torch): the CLI reads these when it builds its options.
"""

# Reasoning: whatever is encoded on its own (a query, an item sent to `encode` or to the server) lets
# the model decide (its own p(<think>), or a plug-in gate saved with the checkpoint) ...
DEFAULT_MODE = "auto"
# ... while the corpus side of a retrieval (index build, evaluation candidates) is embedded directly,
# as the paper and VLM2Vec embed targets.
CORPUS_MODE = "direct"
THINK_THRESHOLD = 0.5  # auto: reason when p(<think>) >= this
MAX_REASONING_TOKENS = 128  # the reasoning budget; </think> is forced when it runs out

# A bad item (unreadable image, bad text, bad input line) fails alone, named, and every other item is
# still encoded; "raise" stops at the first one. (The server answers the request that holds a bad item
# with a 400 naming it; other requests that shared its model batch are served.)
DEFAULT_ON_ERROR = "skip"

# Decompression-bomb guard: images over this many pixels are refused before they are decoded.
MAX_IMAGE_PIXELS = 4096 * 4096

BATCH_SIZE = 32
