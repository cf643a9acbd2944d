"""Code that `fastlm export` writes beside a model's weights, for the architectures transformers lacks.

transformers loads such a directory with `trust_remote_code=True`: the files here import only torch and transformers,
never fastlm, so that an export runs where fastlm is not installed. fastlm.hf imports them as ordinary modules to
build the model it exports.
"""
