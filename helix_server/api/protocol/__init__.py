"""Wire types (msgspec Structs) of the OpenAI-compatible API and the original Helix endpoints.

Request Structs forbid unknown fields: a field OpenAI's API has but that changes nothing here (`user`,
`metadata`, `store`, ...) is declared and ignored; a field we do not support yet is declared and
refused when set (see `serving.params.reject_unsupported`); anything else is a 400 naming it.
"""
