"""Turning text into memory: reading a corpus, and encoding its documents with a model."""

from .corpus import SourceDocument, read_corpus
from .encode import add_documents, encode_documents, index_corpus
from .stdlib import stdlib_texts

__all__ = ["SourceDocument", "add_documents", "encode_documents", "index_corpus", "read_corpus", "stdlib_texts"]
