package apicost

import (
	"bufio"
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"k8s.io/client-go/kubernetes"
)

// initialRequests counts, from the API server's own metrics, how
// informers fetched their initial state: WatchList streams (a watch with
// sendInitialEvents, apiserver_watch_list_duration_seconds) and LISTs, by
// resource. The counting proxy sees only TLS; this says which of the two
// the bytes were.
type initialRequests struct {
	watchList, list map[string]float64
}

func scrapeInitialRequests(ctx context.Context, cs kubernetes.Interface) (initialRequests, error) {
	raw, err := cs.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return initialRequests{}, fmt.Errorf("reading the API server's metrics: %w", err)
	}
	r := initialRequests{watchList: map[string]float64{}, list: map[string]float64{}}
	sc := bufio.NewScanner(strings.NewReader(string(raw)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "apiserver_watch_list_duration_seconds_count{"):
			r.watchList[label(line, "resource")] += value(line)
		case strings.HasPrefix(line, "apiserver_request_total{") && label(line, "verb") == "LIST":
			r.list[label(line, "resource")] += value(line)
		}
	}
	return r, sc.Err()
}

func label(line, name string) string {
	_, rest, ok := strings.Cut(line, name+`="`)
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(rest, `"`)
	return v
}

func value(line string) float64 {
	f, _ := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
	return f
}

// since is what was requested after before, as "resource:count" sorted.
func (r initialRequests) since(before initialRequests) (watchList, list string) {
	return delta(r.watchList, before.watchList), delta(r.list, before.list)
}

func delta(now, before map[string]float64) string {
	var out []string
	for res, n := range now {
		if d := n - before[res]; d > 0 {
			out = append(out, fmt.Sprintf("%s:%.0f", res, d))
		}
	}
	sort.Strings(out)
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, " ")
}
