"""VLM-R1 data formats for vlmr1: the JSONL conversation format and the published REC JSON.

Components: :class:`~vlmr1_jsonl.jsonl.VlmR1Jsonl` (``vlmr1_jsonl``) and
:class:`~vlmr1_jsonl.rec.RecJson` (``vlmr1_rec_json``).
"""

__version__ = "0.1.0"
