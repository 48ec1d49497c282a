"""Chat templates for serving: ``llmarch.data.chat_template``, where fine-tuning's chat data path
(``llmarch.data.chat``) reads them too without importing the server."""

from llmarch.data.chat_template import TEMPLATE_FILE, TOKENIZER_CONFIG, ChatTemplate

__all__ = ["TEMPLATE_FILE", "TOKENIZER_CONFIG", "ChatTemplate"]
