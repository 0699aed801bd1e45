"""cmarr.pipelines."""
