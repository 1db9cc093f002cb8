"""Getting spans in and keeping them: OTLP receivers, trace-file readers, decode, the span store."""
