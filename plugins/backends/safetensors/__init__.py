"""SafeTensors models through transformers and torch: the backend plugin (``safetensors_backend``), the
loaded model (``safetensors_model``), its batching engine (``safetensors_engine``) and detokenizing
(``safetensors_text``)."""
