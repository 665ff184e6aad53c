package certcheck

import (
	"strconv"
	"strings"
	"unicode/utf8"
)

// quoteSafe quotes a value a client sent for an error message: Redacted
// if it looks like a key, cut after 100 characters if long.
func quoteSafe(v string) string {
	if LooksSecret(v) {
		return Redacted
	}
	if utf8.RuneCountInString(v) > 100 {
		return strconv.Quote(string([]rune(v)[:100])) + "…"
	}
	return strconv.Quote(v)
}

// Redacted stands in an error or a log line for text that looks like a
// key.
const Redacted = "[redacted: looks like a key or PEM block]"

// minSecretRun is the shortest run of base64 characters taken for key
// material: a 32-byte key in base64 is 44 characters; no valid DNS label
// (63 characters at most) of letters alone mixes digits and both cases
// that long without being refused anyway.
const minSecretRun = 40

// LooksSecret reports whether s holds text that looks like a PEM block or
// key material (see Redact).
func LooksSecret(s string) bool { return Redact(s) != s }

// Redact returns s with every PEM block (from "-----BEGIN" to the end of
// its "-----END …-----" line, or of s) and every run of 40 or more base64
// characters that mixes digits, upper and lower case replaced by
// Redacted. Errors and log lines pass what a client sent through it, so
// that a private key pasted in the wrong field is never quoted back.
func Redact(s string) string {
	if !strings.Contains(s, "-----BEGIN") && !hasSecretRun(s) {
		return s
	}
	var b strings.Builder
	for {
		i := strings.Index(s, "-----BEGIN")
		if i < 0 {
			break
		}
		b.WriteString(redactRuns(s[:i]))
		b.WriteString(Redacted)
		rest := s[i+len("-----BEGIN"):]
		end := strings.Index(rest, "-----END")
		if end < 0 {
			s = ""
			break
		}
		rest = rest[end+len("-----END"):]
		if j := strings.Index(rest, "-----"); j >= 0 {
			rest = rest[j+len("-----"):]
		} else {
			rest = ""
		}
		s = rest
	}
	b.WriteString(redactRuns(s))
	return b.String()
}

func isBase64(c byte) bool {
	return c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '+' || c == '/' || c == '=' || c == '-' || c == '_'
}

// secretRun reports whether s[i:j], a run of base64 characters, is long
// and mixed enough to be key material.
func secretRun(r string) bool {
	if len(r) < minSecretRun {
		return false
	}
	var digit, upper, lower bool
	for i := 0; i < len(r); i++ {
		switch c := r[i]; {
		case c >= '0' && c <= '9':
			digit = true
		case c >= 'A' && c <= 'Z':
			upper = true
		case c >= 'a' && c <= 'z':
			lower = true
		}
	}
	return digit && upper && lower
}

func hasSecretRun(s string) bool {
	for i := 0; i < len(s); {
		j := i
		for j < len(s) && isBase64(s[j]) {
			j++
		}
		if secretRun(s[i:j]) {
			return true
		}
		i = j + 1
	}
	return false
}

func redactRuns(s string) string {
	if !hasSecretRun(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		j := i
		for j < len(s) && isBase64(s[j]) {
			j++
		}
		if secretRun(s[i:j]) {
			b.WriteString(Redacted)
		} else {
			b.WriteString(s[i:j])
		}
		if j < len(s) {
			b.WriteByte(s[j])
		}
		i = j + 1
	}
	return b.String()
}
