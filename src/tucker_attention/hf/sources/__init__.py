"""The original models a command reads: a local folder, a GGUF file or a bundled name, loaded offline.

``files`` (where a model's files are: :func:`~.files.model_path`, :func:`~.files.load_model`),
``readable`` (the gate every source passes: headers readable, nothing loaded yet), ``gguf`` (GGUF
files through transformers' reader), ``original`` (the original of ``convert`` / ``distill``:
:func:`~.original.load_source`, ``ConvertError``), ``compute`` (run a bfloat16/float16 model as if
it were float32, one module at a time).
"""
