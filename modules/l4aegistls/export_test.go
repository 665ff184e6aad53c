package l4aegistls

import "go.uber.org/zap"

// SetLogger replaces the logger that Provision set, for tests that read the
// debug log.
func (h *Handler) SetLogger(l *zap.Logger) { h.logger = l }
