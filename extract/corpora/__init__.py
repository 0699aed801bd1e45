"""Corpus readers (IEMOCAP, MSP-IMPROV) and the utterance manifest they write."""
