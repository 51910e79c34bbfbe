// A PostgreSQL JDBC workload for pypool's driver tests (tests/integration/test_drivers.py).
//
// Usage: java -cp postgresql.jar:. JdbcWorkload <jdbc-url> <user> <password> <table> <clients> <rounds> <rows>
//
// Each client thread keeps the driver's defaults (prepareThreshold = 5, so its
// statements become named server-side statements after a few executions),
// sets session parameters, and then per round inserts a batch with
// executeBatch (pipelined Bind/Execute, with Flush) inside a transaction,
// reads its own totals back and checks that its settings are still its own.
// Any mismatch throws; the process prints "OK <rows checked>" on success.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicLong;

public class JdbcWorkload {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("sslmode", "disable");
        String table = args[3];
        int clients = Integer.parseInt(args[4]);
        int rounds = Integer.parseInt(args[5]);
        int rows = Integer.parseInt(args[6]);
        AtomicLong checked = new AtomicLong();
        List<Thread> threads = new ArrayList<>();
        List<Throwable> failures = new ArrayList<>();
        for (int c = 1; c <= clients; c++) {
            final int client = c;
            Thread t = new Thread(() -> {
                try {
                    runClient(url, props, table, client, rounds, rows, checked);
                } catch (Throwable e) {
                    synchronized (failures) {
                        failures.add(e);
                    }
                }
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join();
        }
        if (!failures.isEmpty()) {
            for (Throwable e : failures) {
                e.printStackTrace();
            }
            System.exit(1);
        }
        System.out.println("OK " + checked.get());
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    static void runClient(String url, Properties props, String table, int client, int rounds, int rows,
                          AtomicLong checked) throws SQLException {
        try (Connection conn = DriverManager.getConnection(url, props)) {
            String app = "jdbc-" + client;
            String timeout = (20000 + client) + "ms";
            try (Statement st = conn.createStatement()) {
                st.execute("SET application_name = '" + app + "'");
                st.execute("SET statement_timeout = '" + timeout + "'");
            }
            conn.setAutoCommit(false);
            // The client number in the text makes each client's statement of this name its own.
            PreparedStatement insert = conn.prepareStatement(
                "INSERT INTO " + table + " (client, n, v) VALUES (?, ?, ? + " + client + " - " + client + ")");
            PreparedStatement totals = conn.prepareStatement(
                "SELECT " + client + " AS me, count(*), coalesce(sum(v), 0) FROM " + table + " WHERE client = ?");
            PreparedStatement settings = conn.prepareStatement(
                "SELECT current_setting('application_name'), current_setting('statement_timeout')");
            long expectedSum = 0;
            for (int round = 0; round < rounds; round++) {
                for (int k = 0; k < rows; k++) {
                    insert.setInt(1, client);
                    insert.setInt(2, round * rows + k);
                    insert.setLong(3, k);
                    insert.addBatch();
                    expectedSum += k;
                }
                int[] counts = insert.executeBatch();
                check(counts.length == rows, "batch size");
                conn.commit();
                totals.setInt(1, client);
                try (ResultSet rs = totals.executeQuery()) {
                    check(rs.next(), "totals row");
                    check(rs.getInt(1) == client, "statement of another client ran: me=" + rs.getInt(1));
                    check(rs.getLong(2) == (long) (round + 1) * rows, "row count " + rs.getLong(2));
                    check(rs.getLong(3) == expectedSum, "sum " + rs.getLong(3) + " != " + expectedSum);
                }
                try (ResultSet rs = settings.executeQuery()) {
                    check(rs.next(), "settings row");
                    check(app.equals(rs.getString(1)), "application_name " + rs.getString(1) + " != " + app);
                    check(timeout.equals(rs.getString(2)), "statement_timeout " + rs.getString(2) + " != " + timeout);
                }
                conn.commit();
                checked.addAndGet(rows);
            }
            // A SET rolled back with its transaction is undone, as PostgreSQL defines.
            try (Statement st = conn.createStatement()) {
                st.execute("SET statement_timeout = '7s'");
            }
            conn.rollback();
            try (ResultSet rs = settings.executeQuery()) {
                check(rs.next() && timeout.equals(rs.getString(2)), "rolled-back SET survived");
            }
            conn.commit();
        }
    }
}
