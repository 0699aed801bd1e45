"""Corpus readers (IEMOCAP, MSP-IMPROV, a folder of media files) and the utterance manifest they write."""
