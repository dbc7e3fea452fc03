package cni

import (
	"encoding/json"
	"os"
	"path/filepath"

	"github.com/sluice-net/sluice/internal/atomicfile"
)

type ipamRecord struct {
	Type string          `json:"type"`
	Conf json.RawMessage `json:"conf"`
}

func recordPath(dir, containerID, ifName string) string {
	return filepath.Join(dir, containerID+"-"+ifName+".json")
}

func saveIPAMConf(dir, containerID, ifName, typ string, conf []byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(ipamRecord{Type: typ, Conf: conf})
	if err != nil {
		return err
	}
	return atomicfile.Write(recordPath(dir, containerID, ifName), b, 0o600)
}

func loadIPAMConf(dir, containerID, ifName string) (string, []byte, bool) {
	b, err := os.ReadFile(recordPath(dir, containerID, ifName))
	if err != nil {
		return "", nil, false
	}
	var r ipamRecord
	if json.Unmarshal(b, &r) != nil || r.Type == "" {
		return "", nil, false
	}
	return r.Type, r.Conf, true
}

func removeIPAMConf(dir, containerID, ifName string) {
	_ = os.Remove(recordPath(dir, containerID, ifName))
}
