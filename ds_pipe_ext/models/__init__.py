"""Reference models as pipeline layer lists, for the examples, ``ds-pipe plan`` and the benchmarks.

The library itself needs none of them; the image models need torchvision (``ds_pipe_ext[examples]``).
"""
