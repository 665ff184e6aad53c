package admin_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// With SQLite the cluster is this node: GET /api/v1/cluster lists it,
// stats?node=all gives its rows with its name, the connection log tags its
// entries and filters by node; a node that is not there and a stray
// parameter are 400s that say what to send.
func TestClusterOfOneNode(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	app := streamsApp()
	app["node_name"] = "solo"
	inst := startCaddy(t, app, nil)
	port := freePort(t)
	sid := id(inst.create(stream(0, port, up.Port, nil)))

	var view struct {
		Node    string `json:"node"`
		Storage string `json:"storage"`
		Nodes   []struct {
			Name     string `json:"name"`
			Status   string `json:"status"`
			LastSeen string `json:"last_seen"`
			Streams  []obj  `json:"streams"`
		} `json:"nodes"`
	}
	inst.call("GET", "/api/v1/cluster", nil).want(t, http.StatusOK).decode(t, &view)
	if view.Node != "solo" || view.Storage != "sqlite" || len(view.Nodes) != 1 || view.Nodes[0].Name != "solo" ||
		view.Nodes[0].Status != "up" || len(view.Nodes[0].Streams) != 1 || !strings.HasSuffix(view.Nodes[0].LastSeen, "Z") {
		t.Fatalf("cluster view: %+v", view)
	}

	// With SQLite the stream rows have no cluster totals.
	for _, path := range []string{"/api/v1/streams", fmt.Sprintf("/api/v1/streams/%d", sid)} {
		if body := inst.call("GET", path, nil).want(t, http.StatusOK).body; strings.Contains(string(body), `"cluster"`) {
			t.Fatalf("GET %s with SQLite: %s", path, body)
		}
	}

	rows := inst.call("GET", "/api/v1/streams/stats?node=all", nil).want(t, http.StatusOK).list(t)
	if len(rows) != 1 || rows[0]["node"] != "solo" || id(rows[0]) != sid {
		t.Fatalf("stats?node=all: %v", rows)
	}
	if rows := inst.call("GET", "/api/v1/streams/stats?node=solo", nil).want(t, http.StatusOK).list(t); len(rows) != 1 {
		t.Fatalf("stats?node=solo: %v", rows)
	}
	if rows := inst.call("GET", "/api/v1/streams/stats", nil).want(t, http.StatusOK).list(t); len(rows) != 1 || rows[0]["node"] != nil {
		t.Fatalf("stats without node: %v", rows)
	}
	for query, want := range map[string]string{
		"/api/v1/streams/stats?node=other": `node "other": no such node`,
		"/api/v1/streams/stats?node=":      "give a node's name, or all",
		"/api/v1/streams/stats?nod=all":    `unknown query parameter "nod"`,
		"/api/v1/cluster?x=1":              `unknown query parameter "x"`,
	} {
		if e := inst.call("GET", query, nil).apiErr(t, http.StatusBadRequest); !strings.Contains(e.Error, want) {
			t.Errorf("GET %s: %q, want it to say %q", query, e.Error, want)
		}
	}

	c := testenv.Dial(t, port)
	testenv.RoundTrip(t, c, "logged")
	c.Close()
	path := fmt.Sprintf("/api/v1/streams/%d/connections", sid)
	eventually(t, "the connection's log entry", func() bool {
		return strings.Contains(string(inst.call("GET", path, nil).want(t, http.StatusOK).body), `"node":"solo"`)
	})
	if body := inst.call("GET", path+"?node=other", nil).want(t, http.StatusOK).body; !strings.Contains(string(body), `"entries":[]`) {
		t.Fatalf("node=other: %s", body)
	}
	if body := inst.call("GET", path+"?node=solo", nil).want(t, http.StatusOK).body; !strings.Contains(string(body), `"node":"solo"`) {
		t.Fatalf("node=solo: %s", body)
	}
}
