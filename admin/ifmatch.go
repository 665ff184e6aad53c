package admin

import (
	"fmt"
	"net/http"
	"strings"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// A stream's ETag is its version (spec.HostStatus.Version) in quotes.
// GET, POST, PUT and PATCH send it; PUT, PATCH and DELETE with If-Match change the
// stream only if it still has one of the versions listed, so that a client
// does not overwrite a change it has not seen. Without If-Match they
// change it whatever its version.

// etag is the ETag of a stream version.
func etag(version string) string { return `"` + version + `"` }

// setETag sets the ETag header of a response about one stream.
func setETag(w http.ResponseWriter, hs spec.HostStatus) {
	w.Header().Set("ETag", etag(hs.Version))
}

// ifMatch reads the request's If-Match header into a precondition for
// stream id: nil without the header, a 400 if it is malformed.
func ifMatch(r *http.Request, id int64) ([]streams.Precondition, error) {
	vals := r.Header.Values("If-Match")
	if len(vals) == 0 {
		return nil, nil
	}
	tags, star, err := parseETags(strings.Join(vals, ","))
	if err != nil {
		return nil, &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf(
			"If-Match %q: %v; send the ETag that GET %s/%d answered, quotes included, or *", strings.Join(vals, ", "), err, basePath, id)}
	}
	return []streams.Precondition{func(version string) error {
		if star {
			return nil
		}
		for _, t := range tags {
			if withoutEncoding(t) == etag(version) {
				return nil
			}
		}
		if len(tags) == 0 { // weak ones only
			return &apiError{Status: http.StatusPreconditionFailed, Message: fmt.Sprintf(
				"If-Match %q: a weak entity tag (W/...) never matches; send the ETag that GET %s/%d answered, without W/", strings.Join(vals, ", "), basePath, id)}
		}
		return &apiError{Status: http.StatusPreconditionFailed, Message: fmt.Sprintf(
			"stream %d was changed by someone else since you loaded it; load it again and redo your change", id)}
	}}, nil
}

// withoutEncoding is tag without the suffix that Caddy's encode handler
// puts in the ETag of a response it compresses ("2" → "2-gzip"), which
// clients send back as it is; a version never has one.
func withoutEncoding(tag string) string {
	for _, enc := range []string{"-gzip", "-zstd", "-br"} {
		if v, ok := strings.CutSuffix(tag, enc+`"`); ok {
			return v + `"`
		}
	}
	return tag
}

// parseETags parses an If-Match value: "*", or a comma-separated list of
// entity tags. It returns the strong tags, quotes included; weak ones
// (W/"…") never match, as If-Match compares strongly.
func parseETags(s string) (tags []string, star bool, err error) {
	if strings.TrimSpace(s) == "*" {
		return nil, true, nil
	}
	rest := s
	for {
		rest = strings.TrimLeft(rest, " \t,")
		if rest == "" {
			break
		}
		weak := strings.HasPrefix(rest, "W/")
		if weak {
			rest = rest[2:]
		}
		if !strings.HasPrefix(rest, `"`) {
			return nil, false, fmt.Errorf("not a list of entity tags (each in double quotes, as in \"3f2a…\")")
		}
		end := strings.IndexByte(rest[1:], '"')
		if end < 0 {
			return nil, false, fmt.Errorf("an entity tag has no closing quote")
		}
		tag := rest[:end+2]
		rest = strings.TrimLeft(rest[end+2:], " \t")
		if rest != "" && rest[0] != ',' {
			return nil, false, fmt.Errorf("entity tags must be separated by commas")
		}
		if !weak {
			tags = append(tags, tag)
		}
	}
	if len(tags) == 0 && !strings.Contains(s, `"`) {
		return nil, false, fmt.Errorf("no entity tag")
	}
	return tags, false, nil
}
