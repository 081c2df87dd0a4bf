"""The images and what is known about them: finding a labelled set's layout and classes
(``layouts``), decoding images safely within a byte cap (``images``, shared with predict), the
decode workers that fill prepare's uint8 cache (``decoding``), the per-class checks and the
stratified split (``splitting``), the content record of ``data/prepared`` (``integrity``), reading
the prepared splits as datasets and loaders (``dataset``) and the train/eval transform presets
(``transforms``). It may import ``catdog.core`` and third-party packages, not the model, tracking,
serving or the stages.
"""
