"""cmarr.extract."""
